"""Where a batch runs: instances (a worker thread, or a worker process through shared memory), the
devices they are placed on (CPU, cuda:N), and the runtimes (backends) that compute."""
