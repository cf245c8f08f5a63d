"""The peers of the Triton stack in `make bench`: Ray Serve, LitServe and MLServer, each
serving the same built graphs through the same runtime, preprocessing and decode loop
(bench/peers/pipeline.py), each in its own venv (bench/peers/venv.py) and each with its
own framework's dynamic batching. Nothing here imports a peer framework at module level:
the bench's own process (the project venv) only starts them."""
