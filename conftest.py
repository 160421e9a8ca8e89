"""Root conftest: unit tests and nbval kernels run with the pinned CPU numerics of ``atp-repro``.

Loaded by pytest before any test module imports torch; kernels started by nbval inherit the
environment (``ATP_REPRO_NUMERICS=native`` opts out, as for the command line).
"""

from atp_repro import numerics

numerics.apply()
