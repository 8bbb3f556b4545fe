"""The CMATH model, one paper component per file, in the order data flows: config (the model's and the
training run's settings, presets), reconstruction (step 1), cma_transformer (step 2), fusion (step 3),
distillation (step 4), cmath (the whole model)."""
