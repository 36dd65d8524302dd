"""The MQTT runtime: server coordinator and device agents, calling the transport-free algorithm steps."""
