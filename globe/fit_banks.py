"""`python -m globe.fit_banks [overrides]`: the Hydra entry point under the name the README gives it; the code is
globe.hydra_app."""
from __future__ import annotations

import sys

from globe.hydra_app import (CONFIG_NAME, GROUPS, FitBanksConfig, compose_run_config, main,  # noqa: F401
                             register_configs, rewrite_model_override, run, to_run_config)

if __name__ == "__main__":
    sys.exit(main())
