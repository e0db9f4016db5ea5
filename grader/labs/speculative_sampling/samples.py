"""grader.labs.speculative_sampling.samples: sample submissions of the speculative_sampling lab, each a known kind of
learner work, with the grade a careful human grader would give. `grader.samples.build("speculative_sampling", out)`
writes them as notebooks.

Each variant edits answer cells of a fully solved notebook (`replace`: one textual edit of the reference answer, a
learner's typical mistake; `cells`: a whole answer cell); `from_release` variants start from the learner release.
SS4 builds on SS2 and SS5 on SS4 (`requires`): a sample whose SS2 fails gets no SS4 or SS5 points, whatever its
lookup, and is never timed. `timed` says what the timing stage gives SS5 where its gate (right tokens with prompt
lookup on a timed prompt) passes; the check stage alone gives the gate's points.
"""

ALL = {"SS1": 2, "SS2": 3, "SS3": 3, "SS4": 2, "SS5": 2}

# ---------------------------------------------------------------- a correct solution, written differently

DIFFERENT_SS1 = '''
class RollbackKVCache:
    # One list of (k, v) buffers per layer, grown on demand; `length` is a plain attribute.
    def __init__(self, args, batch_size, max_seq_len, dtype=torch.float32, device="cpu"):
        shape = (batch_size, args.n_kv_heads, max_seq_len, args.head_dim)
        self.layers = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                       for _ in range(args.n_layers)]
        self.length = 0

    def update(self, layer, input_pos, k, v):
        keys, values = self.layers[layer]
        keys.index_copy_(2, input_pos, k)
        values.index_copy_(2, input_pos, v)
        self.length = int(input_pos[-1]) + 1
        return keys[:, :, :self.length], values[:, :, :self.length]

    def rollback(self, length):
        if length > self.length or length < 0:
            raise ValueError(f"rollback({length}) but only {self.length} positions are held")
        for keys, values in self.layers:  # zero what is forgotten: not needed, but a tidy state
            keys[:, :, length:self.length] = 0
            values[:, :, length:self.length] = 0
        self.length = length
'''

DIFFERENT_SS2 = '''
class DraftModelDrafter:
    # Tracks only how many positions its cache holds, and the tokens behind them.
    def __init__(self, model, max_seq_len):
        self.model, self.history = model, []
        self.cache = RollbackKVCache(model.args, 1, max_seq_len)

    def propose(self, tokens, gamma):
        common = 0
        for a, b in zip(self.history, tokens[:-1]):
            if a != b:
                break
            common += 1
        self.cache.rollback(common)
        self.history = self.history[:common]
        pending, proposal = tokens[common:], []
        with torch.no_grad():
            while len(proposal) < gamma:
                positions = torch.arange(len(self.history), len(self.history) + len(pending))
                nxt = self.model(torch.tensor(pending).unsqueeze(0), positions, self.cache)[0, -1].argmax().item()
                self.history.extend(pending)
                proposal.append(nxt)
                pending = [nxt]
        return proposal


def speculative_generate(target, drafter, prompt, max_new_tokens, gamma, eos_id=None):
    check_length(target, len(prompt), max_new_tokens)
    cache = RollbackKVCache(target.args, 1, len(prompt) + max_new_tokens)
    generated = []
    with torch.no_grad():
        last = target(torch.tensor([prompt]), torch.arange(len(prompt)), cache)[0, -1].argmax().item()
        while True:
            generated.append(last)
            if len(generated) >= max_new_tokens or last == eos_id:
                return generated
            room = max_new_tokens - len(generated) - 1
            guesses = drafter.propose(prompt + generated, min(gamma, room)) if room > 0 else []
            base = len(prompt) + len(generated) - 1
            verdict = target(torch.tensor([[last] + guesses]), torch.arange(base, base + 1 + len(guesses)), cache)[0]
            best = verdict.argmax(dim=-1)
            n_ok = 0
            while n_ok < len(guesses) and guesses[n_ok] == best[n_ok].item():
                n_ok += 1
            cache.rollback(base + 1 + n_ok)
            for token in guesses[:n_ok]:
                generated.append(token)
                if token == eos_id or len(generated) >= max_new_tokens:
                    return generated[:max_new_tokens]
            last = best[n_ok].item()
'''

DIFFERENT_SS3 = '''
def verify_drafts(draft_tokens, draft_logits, target_logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    # Probabilities taken with the runtime's own sampler filter; accept test written as u <= p/q.
    if temperature == 0:
        best = target_logits.argmax(dim=-1)
        out = []
        for i, token in enumerate(draft_tokens):
            if token != best[i].item():
                return out + [best[i].item()]
            out.append(token)
        return out + [best[len(draft_tokens)].item()]
    target_p = filtered_probs(target_logits / temperature, top_k, top_p)
    draft_q = filtered_probs(draft_logits / temperature, top_k, top_p)
    out = []
    for i, token in enumerate(draft_tokens):
        ratio = target_p[i, token] / draft_q[i, token]
        if torch.rand(1, generator=generator).item() <= ratio.item():
            out.append(token)
        else:
            leftover = torch.relu(target_p[i] - draft_q[i])
            return out + [torch.multinomial(leftover, 1, generator=generator).item()]
    return out + [torch.multinomial(target_p[-1], 1, generator=generator).item()]
'''

DIFFERENT_SS4 = '''
class PromptLookupDrafter:
    # Scans n-grams from the longest, matching with a dictionary of last positions.
    def __init__(self, max_ngram=3):
        self.max_ngram = max_ngram

    def propose(self, tokens, gamma):
        for n in range(self.max_ngram, 0, -1):
            if len(tokens) <= n:
                continue
            last_seen = {}
            for start in range(len(tokens) - n):
                last_seen[tuple(tokens[start:start + n])] = start
            hit = last_seen.get(tuple(tokens[-n:]))
            if hit is not None:
                return tokens[hit + n:hit + n + gamma]
        return []
'''

# ---------------------------------------------------------------- known mistakes

# The drafter never rolls its cache back: the rejected drafts stay in it, and the tokens that replace them are fed
# after them. The tokens stay right (the target verifies them); the drafts come from a garbled context.
NO_ROLLBACK_SS2 = ("        self.cache.rollback(keep)\n        self.fed = self.fed[:keep]\n",
                   "        # (no rollback: the rejected drafts stay in the cache, the new tokens go after them)\n")
# Verifies each draft with its own target call: the target's tokens, one target call per token.
PER_TOKEN_SS2 = ("        g = min(gamma, max_new_tokens - len(out) - 1)", "        g = 0")
# On a rejection, draws from p instead of the residual max(0, p - q).
NO_RESIDUAL_SS3 = ("residual = (p[i] - q[i]).clamp(min=0)", "residual = p[i]")
# Accepts with probability p(x) - q(x) instead of min(1, p(x)/q(x)).
P_MINUS_Q_SS3 = ("if u * float(q[i, x]) < float(p[i, x]):", "if u < float(p[i, x] - q[i, x]):")
# Accepts every draft.
ALWAYS_ACCEPT_SS3 = ("if u * float(q[i, x]) < float(p[i, x]):", "if True:")
# Treats every temperature as greedy.
GREEDY_ONLY_SS3 = ("    if temperature == 0.0:  # greedy", "    if True:  # greedy")

# Verifies by recomputing the whole sequence without the cache: the target's tokens, one target call per round (SS2
# and SS4 pass), but each call processes every position, so prompt lookup is slower than cached decoding.
RECOMPUTE_VERIFY_SS2 = (
    """        choice = target(fed, torch.arange(start, start + len(fed[0]), device=weight.device),
                        cache)[0].argmax(-1).tolist()  # the target's token after each fed one
        k = 0
        while k < len(drafts) and drafts[k] == choice[k]:
            k += 1
        cache.rollback(start + k + 1)  # keep the newest token and the accepted drafts; the rest was wrong
""",
    """        everything = torch.tensor([prompt + out + drafts], device=weight.device)  # every position, no cache
        choice = target(everything)[0, start:].argmax(-1).tolist()  # the target's token after each fed one
        k = 0
        while k < len(drafts) and drafts[k] == choice[k]:
            k += 1
""")

# ---------------------------------------------------------------- attacks specific to the lab

# Drafts with a private copy of the target (the bundled weights are readable in the sandbox): every draft would
# be accepted. The grader sees drafts that are not the draft model's, and fewer target calls than it allows.
PEEK_TARGET_SS2 = ("        weight = model.embed_tokens.weight\n",
                   "        model = load_model(\"tiny\")  # drafts with the target itself\n"
                   "        weight = model.embed_tokens.weight\n")

SAMPLES = {
    "reference": {"cells": {}, "expected": ALL, "timed": "passed", "flags": False},
    "stub": {"from_release": True, "cells": {}, "expected": {"SS1": 0, "SS2": 0, "SS3": 0, "SS4": 0, "SS5": 0},
             "flags": False},
    "different-but-correct": {"cells": {"ss1-solution": DIFFERENT_SS1, "ss2-solution": DIFFERENT_SS2,
                                        "ss3-solution": DIFFERENT_SS3, "ss4-solution": DIFFERENT_SS4},
                              "expected": ALL, "timed": "passed", "flags": False},
    "no-rollback": {"replace": {"ss2-solution": NO_ROLLBACK_SS2}, "cells": {},
                    "expected": {"SS1": 2, "SS2": 0, "SS3": 3, "SS4": 0, "SS5": 0}, "flags": False},
    "target-per-token": {"replace": {"ss2-solution": PER_TOKEN_SS2}, "cells": {},
                         "expected": {"SS1": 2, "SS2": 0, "SS3": 3, "SS4": 0, "SS5": 0}, "flags": False},
    "no-residual": {"replace": {"ss3-solution": NO_RESIDUAL_SS3}, "cells": {},
                    "expected": {"SS1": 2, "SS2": 3, "SS3": 0, "SS4": 2, "SS5": 2}, "flags": False},
    "p-minus-q": {"replace": {"ss3-solution": P_MINUS_Q_SS3}, "cells": {},
                  "expected": {"SS1": 2, "SS2": 3, "SS3": 0, "SS4": 2, "SS5": 2}, "flags": False},
    "always-accept": {"replace": {"ss3-solution": ALWAYS_ACCEPT_SS3}, "cells": {},
                      "expected": {"SS1": 2, "SS2": 3, "SS3": 0, "SS4": 2, "SS5": 2}, "flags": False},
    "greedy-only": {"replace": {"ss3-solution": GREEDY_ONLY_SS3}, "cells": {},
                    "expected": {"SS1": 2, "SS2": 3, "SS3": 0, "SS4": 2, "SS5": 2}, "flags": False},
    # Right everywhere; slower than cached decoding when timed, so the timing stage gives SS5 nothing.
    "verify-recomputes": {"replace": {"ss2-solution": RECOMPUTE_VERIFY_SS2}, "cells": {},
                          "expected": {**ALL, "SS5": 0}, "timed": "failed", "flags": False},
    "peeks-at-target": {"replace": {"ss2-solution": PEEK_TARGET_SS2}, "cells": {},
                        "expected": {"SS1": 2, "SS2": 0, "SS3": 3, "SS4": 0, "SS5": 0}, "flags": False},
}
