"""Caption evaluation harness (installed as ``vlm.eval``; never import a bare ``eval``).

Public API:
    vlm.eval.harness.EvalConfig(data=..., model=..., adapter=..., compare=["bf16", "nf4"], endpoint=...,
                                served_model=..., out=..., max_new_tokens=32, prompt=None, ...)
    vlm.eval.harness.run_eval(config) -> results dict (also written to out/results.json)
    vlm.eval.generation.generate_captions(model, processor, items, GenerationSettings(...))
    vlm.eval.endpoint.EndpointClient(url, served_model).generate(items, GenerationSettings(...))
    vlm.eval.metrics.caption_metrics(hypotheses, references, meteor=True)
    vlm.eval.agreement.exact_match_rate / compare_teacher_forced / LogprobStore
    vlm.eval.clipscore.ClipScorer(model_name, pretrained)(images, captions)
    vlm.eval.data.read_eval_items(path) -> [EvalItem(item_id, image, references, prompt, ..., video)]
        (one image or one video per item; video items caption on the families that take video)
"""
