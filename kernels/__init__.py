"""Small fast building blocks. Every fast op here has a plain-PyTorch reference with the same
signature (suffix `_reference`) and a test in tests/test_kernels.py showing that they agree."""
from kernels.attention import attention, attention_reference
from kernels.ops import (all_gather_nograd, all_gather_with_grad, ema_update_, ema_update_reference_,
                         gather_masked, gather_masked_reference)
