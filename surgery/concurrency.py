"""One lock around building transformers models, for callers that use threads (the TUI's workers).

Why: `from_pretrained` installs process-wide patches while it runs (`no_init_weights` swaps torch's init functions,
`no_tie_weights` swaps `PreTrainedModel.tie_weights`). A model built in another thread at the same moment inherits
them: measured in the TUI, a meta-device estimate built during a weight load came out untied (162.8M parameters
instead of 134.5M). Every model construction in `surgery` takes this lock; it is re-entrant.
"""

from __future__ import annotations

import threading

MODEL_BUILD_LOCK = threading.RLock()
