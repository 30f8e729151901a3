"""What two processes agree on, in one place both import: pure codecs and ids, no bus, no I/O.

- ``uds``: ISO 14229 basics with udsoncan's names (NRCs, sessions), the request object and
  the negative-response helper that always names the request's own service, the block
  sequence counter.
- ``files``: the file-transfer protocol (RequestFileTransfer / TransferData / exit) that
  deploys packages to the gateway and owner content to the ECUs; the one name pattern.
- ``link``: the TBOX <-> gateway link beyond file transfer: install (0x0301), inventory
  (0x0302) and content relay (0x0303) routines, their status records, the install manifest.
- ``ecu``: what the gateway and an ECU agree on: DIDs, content routines, the seed/key.
"""
