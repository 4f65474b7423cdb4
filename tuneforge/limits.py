"""Upper bounds for recipe values where a larger one cannot mean anything: the recipe check names them
before anything runs, instead of a crash (or a run directory) halfway through."""

MAX_SEED = 2**32 - 1  # what NumPy's generator accepts
MAX_STEPS = 10**9  # optimizer steps, and anything counted in them
MAX_COUNT = 10**6  # epochs, token lengths, gradient accumulation, ranks
MAX_BATCH = 10**6
MAX_IMAGE_SIDE = 16_384
