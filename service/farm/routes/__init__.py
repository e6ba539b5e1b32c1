"""The API's routers, one module per resource (jobs, releases, batches, artifacts, ops); deps.py holds what
they share. api.create_app includes them."""
