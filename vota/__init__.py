"""The ``vota`` command and the whole simulated vehicle behind ``vota bench``: the entry point,
above the processes (tbox, gateway, ecu_sim, cloud_sim) and the shared foundation (agent)."""
