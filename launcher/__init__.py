"""The serving launcher: starts tritonserver on a built model repository, supervises it
and drains it on SIGTERM. It sits above the model package (`captioner`) and the build
(`builder`), which it runs when a repository is missing or stale."""
