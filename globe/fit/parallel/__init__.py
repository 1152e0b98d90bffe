"""More than one process: the communicator (comm: Comm, LocalComm, DistComm) and this rank's ExpertShard."""
