"""A reinforcement-learning loop on fullgraph, small enough to run on a CPU in seconds.

Each step: rollouts with the logprob of every sampled token; the same logprobs recomputed by
scoring prompt + completion, equal bit for bit because the engine runs in the batch-invariant
mode (docs/batch_invariance.md); a policy-gradient step on a transformers copy of the model;
and the new weights loaded into the running engine (`LLM.update_weights`), which keeps its
CUDA graphs and forgets its prefix cache. The reward is a toy: the share of a completion's
tokens with an even id, which the policy learns to raise.

    python examples/rl_loop.py [--model tiny-qwen3] [--steps 4] [--device cpu]
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM

from fullgraph import LLM, SamplingParams

PROMPTS = ["Beautiful is better than", "Simple is", "Readability"]


def rollouts(llm: LLM, prompts: list[list[int]], seed: int, max_tokens: int):
    """(prompt ids, completion ids, the logprob generation reported for each token)."""
    params = SamplingParams(n=4, temperature=1.0, seed=seed, max_tokens=max_tokens,
                            logprobs=0, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return [(o.prompt_token_ids, c.token_ids,
             [entry[t].logprob for t, entry in zip(c.token_ids, c.logprobs)])
            for o in outs for c in o.outputs]


def scored_logprobs(llm: LLM, samples) -> list[list[float]]:
    """Each completion's token logprobs, as the engine scores prompt + completion."""
    outs = llm.generate(prompt_token_ids=[p + c for p, c, _ in samples],
                        sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=0),
                        use_tqdm=False)
    return [[entry[t].logprob for t, entry in zip(c, out.prompt_logprobs[len(p):])]
            for (p, c, _), out in zip(samples, outs)]


def policy_gradient_step(policy, optimizer, samples, rewards: torch.Tensor) -> None:
    """REINFORCE with the batch's mean reward as baseline, on transformers' forward."""
    advantages = rewards - rewards.mean()
    loss = torch.zeros(())
    for (p, c, _), advantage in zip(samples, advantages):
        logits = policy(torch.tensor([p + c])).logits[0, len(p) - 1:-1].float()
        logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(c)[:, None]).sum()
        loss = loss - advantage * logp
    optimizer.zero_grad()
    (loss / len(samples)).backward()
    optimizer.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-qwen3")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    llm = LLM(a.model, batch_invariant=True, dtype="float32", device=a.device)
    tok = llm.get_tokenizer()
    policy = AutoModelForCausalLM.from_pretrained(llm.engine.config.model.path,
                                                  dtype=torch.float32)
    optimizer = torch.optim.Adam(policy.parameters(), lr=a.lr)
    prompts = [tok.encode(p) for p in PROMPTS]
    for step in range(a.steps):
        samples = rollouts(llm, prompts, seed=step, max_tokens=a.max_tokens)
        same = scored_logprobs(llm, samples) == [lps for _, _, lps in samples]
        rewards = torch.tensor([sum(t % 2 == 0 for t in c) / len(c) for _, c, _ in samples])
        policy_gradient_step(policy, optimizer, samples, rewards)
        llm.update_weights(policy.state_dict())
        print(f"step {step}: {len(samples)} rollouts, mean reward {rewards.mean():.3f}, "
              f"generation == scoring bit for bit: {same}", flush=True)


if __name__ == "__main__":
    main()
