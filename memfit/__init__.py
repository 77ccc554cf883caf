"""memfit: run, serve and train deep-learning models inside a memory budget."""

import os as _os

__version__ = "0.1.0"

# MEMFIT_CPU_ISA=avx512|avx2 runs memfit as on a CPU without AMX / without AVX-512 (memfit.llm.kernels.build.ISA_CAPS
# for memfit's own kernels). oneDNN and ATen read their caps once, at their first use, so they are set here, before
# any; a value the user set wins.
_CAP_ENV = {"avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "ATEN_CPU_CAPABILITY": "avx512"},
            "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}
for _name, _value in _CAP_ENV.get(_os.environ.get("MEMFIT_CPU_ISA", "").strip().lower(), {}).items():
    _os.environ.setdefault(_name, _value)
