"""Training under a memory budget. `memfit.train.local`: backprop-free local learning (tpSGD)."""
