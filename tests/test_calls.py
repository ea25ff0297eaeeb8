"""`fewstep.calls`: a request becomes a plain description of one pipeline call, planned against
what a task may know of the model (a ModelView, no engine), and calls say when they can merge."""

import pytest

from fewstep.calls import ModelView, plan_call
from fewstep.config import Settings
from fewstep.errors import InvalidRequest, ModelError
from fewstep.families import SD15
from fewstep.selftest import sample_image
from fewstep.tasks import ControlNetRequest, LoraRequest, Txt2ImgRequest


def _view(**changes):
    values = dict(family=SD15, native_size=64, inpaint_only=False, settings=Settings(),
                  adapter_geometry=lambda ref: (8, 3), model_ref="tiny")
    return ModelView(**{**values, **changes})


def test_a_plan_is_the_call_with_a_concrete_seed():
    call = plan_call(Txt2ImgRequest(prompt="x", loras=[LoraRequest(ref="s", weight=0.5)]),
                     _view())
    assert (call.task, call.width, call.height, call.count) == ("txt2img", 64, 64, 1)
    assert call.seed is not None and call.record["seed"] == call.seed
    assert call.loras == (("s", 0.5),) and call.arguments == {"width": 64, "height": 64}


def test_plans_check_limits_and_the_model():
    with pytest.raises(InvalidRequest) as info:
        plan_call(Txt2ImgRequest(prompt="x", steps=3), _view(settings=Settings(max_steps=2)))
    assert info.value.field == "steps"
    with pytest.raises(ModelError) as info:
        plan_call(Txt2ImgRequest(prompt="x"), _view(inpaint_only=True))
    assert info.value.field == "model" and "'tiny'" in info.value.message


def test_calls_merge_when_only_prompts_seeds_and_per_prompt_images_differ():
    view = _view()
    a, b = (plan_call(Txt2ImgRequest(prompt=p, seed=s), view) for p, s in (("a", 1), ("b", 2)))
    assert a.merge_key() is not None and a.merge_key() == b.merge_key()
    steps = plan_call(Txt2ImgRequest(prompt="c", seed=3, steps=2), view)
    lora = plan_call(Txt2ImgRequest(prompt="d", seed=4, loras=[LoraRequest(ref="s")]), view)
    assert len({a.merge_key(), steps.merge_key(), lora.merge_key()}) == 3
    # several images of one request come from one generator: never merged
    assert plan_call(Txt2ImgRequest(prompt="e", num_images=2), view).merge_key() is None
    # a control image is given per prompt: control calls of another image still merge
    control = [plan_call(ControlNetRequest(prompt="f", control_image=sample_image(seed=i),
                                           controlnet="c"), view) for i in (1, 2)]
    assert control[0].merge_key() == control[1].merge_key() is not None
