"""The application: the `lodestar` command line (the composition root), the local stack and the demo.

It imports the services and the simulator inside the commands that run them; nothing imports it."""
