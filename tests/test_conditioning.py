"""The conditioning object, precomputed conditioning, and per-call state (text K/V cache, LoRA strength):
two threads on one Pipeline get exactly the images each gets alone."""

import threading

import pytest
import torch

from ldm.conditioning import Conditioning
from ldm.models.lora import add_lora, lora_modules
from ldm.pipelines.pipeline import Pipeline

PROMPTS = ["a red circle at the top left", "a small blue square on a white background"]


@pytest.fixture(scope="module")
def pipe(tiny_sd_folder):
    return Pipeline.from_pretrained(tiny_sd_folder)


def _latents(pipe, prompt, **kw):
    kw = dict(steps=4, guidance_scale=5.0, seed=3, output_type="latent", progress=False) | kw
    return pipe(prompt, **kw)


def test_conditioner_is_built_once_and_follows_a_replaced_encoder(pipe):
    first = pipe.conditioner
    assert pipe.conditioner is first
    original = pipe.text_encoder
    try:
        pipe.text_encoder = original.__class__(original.config).eval()
        assert pipe.conditioner is not first and pipe.conditioner.encoder.model is pipe.text_encoder
    finally:
        pipe.text_encoder = original


def test_precomputed_conditioning_equals_prompts(pipe):
    ref = _latents(pipe, PROMPTS, negative_prompt="blurry", num_images=2)
    cond, uncond = pipe.conditioner.encode(PROMPTS, ["blurry"] * 2)
    # tensors (diffusers' prompt_embeds / negative_prompt_embeds) and Conditioning objects alike
    got = _latents(pipe, None, prompt_embeds=cond.context, negative_prompt_embeds=uncond.context, num_images=2)
    assert torch.equal(got, ref)
    got = _latents(pipe, None, prompt_embeds=cond, negative_prompt="blurry", num_images=2)
    assert torch.equal(got, ref)


def test_conditioning_checks_and_schedule():
    c = Conditioning(torch.zeros(2, 77, 8))
    with pytest.raises(ValueError, match=r"\(batch, tokens, width\)"):
        Conditioning(torch.zeros(77, 8))
    with pytest.raises(ValueError, match="pooled has batch 3"):
        Conditioning(torch.zeros(2, 77, 8), pooled=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="encode them together"):
        Conditioning.cat([c, Conditioning(torch.zeros(2, 154, 8))])
    early, late = Conditioning(torch.ones(2, 77, 8)), Conditioning(torch.full((2, 77, 8), 2.0))
    scheduled = Conditioning(late.context, schedule=((4, early),))
    assert scheduled.at(0) is early and scheduled.at(4) is early and scheduled.at(5) is scheduled
    both = Conditioning.cat([c, early])
    assert both.batch == 4 and torch.equal(both.context[2:], early.context)
    assert torch.equal(c.repeat_interleave(2).context, torch.zeros(4, 77, 8))


def test_bad_precomputed_conditioning(pipe):
    width = pipe.unet.config.context_dim
    with pytest.raises(ValueError, match="differ in shape"):
        pipe(prompt_embeds=torch.zeros(1, 77, width), negative_prompt_embeds=torch.zeros(1, 154, width))
    with pytest.raises(ValueError, match=f"this U-Net takes {width}"):
        pipe(prompt_embeds=torch.zeros(1, 77, width + 1), negative_prompt_embeds=torch.zeros(1, 77, width + 1))
    with pytest.raises(ValueError, match="give a prompt"):
        pipe()


def test_two_threads_on_one_pipeline_get_their_own_images(tiny_sd_folder):
    pipe = Pipeline.from_pretrained(tiny_sd_folder)
    add_lora(pipe.unet, rank=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(pipe.unet).values():  # a LoRA that changes the image
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.5)
    jobs = [dict(prompt=PROMPTS[0], lora_scale=0.0, seed=1), dict(prompt=PROMPTS[1], lora_scale=1.0, seed=2)]
    alone = [_latents(pipe, **job) for job in jobs]
    assert not torch.equal(alone[0], _latents(pipe, PROMPTS[0], lora_scale=1.0, seed=1))  # the scale matters
    results: dict[int, list] = {0: [], 1: []}
    errors = []
    barrier = threading.Barrier(2)

    def run(k):
        try:
            barrier.wait()
            for _ in range(3):  # interleave their steps many times over
                results[k].append(_latents(pipe, **jobs[k]))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in (0, 1):
        for got in results[k]:
            assert torch.equal(got, alone[k]), k
