"""Collective timeouts for real launches that end by a fault, a kill or a signal.

A hang after the first step ends the run at 30 s, one during start-up or a
checkpoint at 120 s (a loaded 2-core box), both inside the launch's own 300 s
(conftest.LAUNCH_TIMEOUT_S): a drill that hangs then fails its own "not a
timeout" assertion instead of hanging the suite.
"""

DRILL_ENV = {"ALBOR_STEP_TIMEOUT_S": "30", "ALBOR_STARTUP_TIMEOUT_S": "120"}
