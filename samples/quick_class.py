"""The bundled sample class of the quick track, graded by `make demo` (`inferlab demo --track quick`).

Six learners through one afternoon, each lab's hand-in one of that lab's samples (grader/labs/<lab>/samples.py,
with the grade a careful human grader gives it): right, slow, wrong, partly done, missing, and one
learner who patches the timer. `opened` is when they first ran the lab's notebook, in minutes after
the track started; `minutes` is how long they worked on it before submitting. A lab a learner
never handed in is simply absent. Due times come from labs/tracks.json (quick: gpu_basics 35 min
after the start, kv_cache 1 h 25, continuous_batching 2 h 30, roi 3 h).
"""

START = "2026-11-23T13:00:00+00:00"

LEARNERS = {
    # Solid throughout, on time everywhere.
    "ada": {"gpu_basics": {"sample": "reference", "opened": 2, "minutes": 28},
            "kv_cache": {"sample": "reference", "opened": 32, "minutes": 45},
            "continuous_batching": {"sample": "reference", "opened": 80, "minutes": 55},
            "roi": {"sample": "reference", "opened": 137, "minutes": 20}},
    # Right tokens, shortcut algorithms: generation without a cache, a scheduler that only refills an empty batch
    # (static batching behind its interface); late from kv_cache on.
    "ben": {"gpu_basics": {"sample": "reference", "opened": 0, "minutes": 35},
            "kv_cache": {"sample": "slow", "opened": 37, "minutes": 60},
            "continuous_batching": {"sample": "slow", "opened": 99, "minutes": 70},
            "roi": {"sample": "partial", "opened": 170, "minutes": 25}},
    # Quick, and wrong in each lab in a different way.
    "chloe": {"gpu_basics": {"sample": "wrong-flops", "opened": 1, "minutes": 20},
              "kv_cache": {"sample": "wrong", "opened": 25, "minutes": 40},
              "continuous_batching": {"sample": "wrong", "opened": 70, "minutes": 50},
              "roi": {"sample": "wrong", "opened": 125, "minutes": 20}},
    # Stuck on the roofline, recovers on kv_cache (late), never hands in continuous_batching,
    # hands in roi untouched.
    "dev": {"gpu_basics": {"sample": "partial", "opened": 3, "minutes": 40},
            "kv_cache": {"sample": "reference", "opened": 45, "minutes": 55},
            "roi": {"sample": "stub", "opened": 175, "minutes": 4}},
    # Cuts corners: a prediction that ignores the model, a patched timer, a shared position.
    "eli": {"gpu_basics": {"sample": "prediction-off", "opened": 5, "minutes": 25},
            "kv_cache": {"sample": "timer-patch", "opened": 31, "minutes": 35},
            "continuous_batching": {"sample": "shared-position", "opened": 70, "minutes": 45},
            "roi": {"sample": "mix", "opened": 118, "minutes": 30}},
    # Skips ahead: times without a warm-up, leaves kv_cache untouched, then does the rest well.
    "fay": {"gpu_basics": {"sample": "no-warmup", "opened": 0, "minutes": 30},
            "kv_cache": {"sample": "stub", "opened": 31, "minutes": 2},
            "continuous_batching": {"sample": "reference", "opened": 35, "minutes": 80},
            "roi": {"sample": "reference", "opened": 118, "minutes": 25}},
}
