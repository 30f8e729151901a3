"""I/O adapters shared by the processes: CAN segments and ISO-TP, the traced UDS client and the UDS
server framework, both ends of the file-transfer protocol, the cloud link and its outbox, atomic
storage, traces and diagnosis inputs on disk, sd_notify."""
