"""Deployment: Dockerfiles, Kubernetes manifests, and the podman tooling that builds and runs
the images here (deploy.images, deploy.containers, deploy.serve_containers)."""
