"""Test-session settings: the smoke profile, offline hubs, no progress bars.

Set here, at import time, so that the notebook kernels nbval starts inherit them too.
"""

import os

os.environ.setdefault("MINILDM_PROFILE", "smoke")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
