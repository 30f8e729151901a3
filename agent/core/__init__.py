"""Pure cores: bytes, records and ``now`` in, typed results out; no bus, no socket, no clock of
their own. Campaigns, owner content and its schedule, the interaction trace, diagnosis, fault
specs, the typed configuration."""
