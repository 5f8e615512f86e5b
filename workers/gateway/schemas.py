"""The documents the HTTP API exchanges, as pydantic models: what the OpenAPI document
shows (the routes read and write them as plain JSON, see :mod:`~workers.gateway.payloads`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

#: The KServe v2 datatypes the wire carries (``payloads.DATATYPES``; a unit test keeps
#: the two equal).
Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                   "INT64", "FP16", "FP32", "FP64"]


class TensorIn(BaseModel):
    """One input tensor, KServe v2 style."""

    name: str = Field(description="The model input's name.")
    datatype: Datatype = Field(description="KServe v2 datatype (FP32, INT64, BOOL, ...).")
    shape: list[int] = Field(description="Dimensions; the first is the batch axis (rows).")
    data: list[Any] | str = Field(
        description="Row-major values, flat or nested; or, with parameters.binary = true, "
                    "the base64 text of the raw little-endian bytes.")
    parameters: dict[str, Any] | None = Field(
        default=None, description='{"binary": true}: data is base64 of the raw bytes.')


class JobRequest(BaseModel):
    """One job: its inputs and how to run it."""

    inputs: list[TensorIn] = Field(min_length=1)
    version: int | str | None = Field(
        default=None, description='A version to pin (2 or "2"), "latest" (the highest), an '
                                  'alias ("stable", see inferq alias), or null: the model\'s '
                                  'route decides.')
    deadline_s: float | None = Field(
        default=None, gt=0, description="Seconds from now; a job still queued past it fails "
                                        "DEADLINE_EXCEEDED and never runs.")
    priority: int = Field(default=0, ge=0, le=9, description="0 is served first, 9 last.")


class BatchJob(BaseModel):
    """One job of a batch request."""

    inputs: list[TensorIn] = Field(min_length=1)


class BatchRequest(BaseModel):
    """Many jobs of one model in one request; each gets its own ID."""

    jobs: list[BatchJob] = Field(min_length=1, max_length=10_000)
    version: int | str | None = None
    deadline_s: float | None = Field(default=None, gt=0)
    priority: int = Field(default=0, ge=0, le=9)


class JobAccepted(BaseModel):
    """A job accepted and queued."""

    job_id: str
    status_url: str = Field(description="GET it for the job's status and result.")


class BatchAccepted(BaseModel):
    jobs: list[JobAccepted]


class TensorOut(BaseModel):
    """One output tensor, KServe v2 style (flat row-major ``data``)."""

    name: str
    datatype: Datatype
    shape: list[int]
    data: list[Any]


class JobDone(BaseModel):
    """A job that succeeded: its outputs and how it was served."""

    job_id: str
    status: Literal["SUCCESS"]
    model: str
    version: int
    worker: str
    batch_size: int = Field(description="Rows of the model run that answered the job.")
    outputs: list[TensorOut]
    timings_ms: dict[str, float | None] = Field(
        description="queued, batch_wait, inference, total (milliseconds).")


class JobPending(BaseModel):
    """A job accepted and not yet answered (queued or running)."""

    job_id: str
    status: Literal["PENDING"]


class JobError(BaseModel):
    code: str = Field(description="The stable inferq code (INVALID_ARGUMENT, POISONED, ...).")
    type: str = Field(description="The Python class a client of the queue would catch.")
    message: str


class JobFailedDoc(BaseModel):
    """A job that ended in FAILURE (the GET succeeded: the job failed)."""

    job_id: str
    status: Literal["FAILURE"]
    model: str | None
    error: JobError


class ProblemDoc(BaseModel):
    """RFC 9457 problem details, with inferq's stable ``code``."""

    type: str
    title: str
    status: int
    detail: str
    code: str = Field(description="INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED, "
                                  "NOT_FOUND, ABORTED, RESOURCE_EXHAUSTED, INTERNAL, "
                                  "POISONED, UNAVAILABLE, DEADLINE_EXCEEDED, WAIT_TIMEOUT")
    instance: str | None = None
    job_id: str | None = None
    model: str | None = None


class TensorSpecDoc(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int] = Field(description="-1 marks a free dimension; a leading -1 the batch.")


class ModelDoc(BaseModel):
    """A model live workers serve, with its signature."""

    name: str
    description: str
    versions: list[int]
    inputs: list[TensorSpecDoc]
    outputs: list[TensorSpecDoc]
    max_batch_rows: int


class ModelsDoc(BaseModel):
    models: list[ModelDoc]
