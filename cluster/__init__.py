"""`make cluster`: three RabbitMQ nodes on this machine, the services on quorum `levels` timers,
and the node that leads most timer queues killed mid-run."""
