"""Starting things: the ``inferq`` command, the per-GPU supervisor, the local stack
(Redis, workers, Flower), private redis-server processes, and the demo."""
