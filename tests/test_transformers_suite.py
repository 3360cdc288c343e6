"""transformers' own model, generation and training test suites, run on the remote code as users load it.

`ModelTesterMixin` (tests/test_modeling_common.py), `GenerationTesterMixin`
(tests/generation/test_utils.py) and `TrainingTesterMixin` (tests/test_training_mixin.py) are the
checks every built-in transformers model passes. Here they run on the checkpoint's copy of
modeling/remote/: a tiny random Llama (GQA) is converted with mla_zoo's converter (lossy: partial
RoPE, low-rank latent), saved with `save_checkpoint`, and the classes come from
`AutoModelForCausalLM` / `AutoModel.from_pretrained(dir, trust_remote_code=True)`. The tester follows
transformers' tests/models/deepseek_v3/test_modeling_deepseek_v3.py.

The upstream files are not committed: tests/transformers_suite/upstream.py downloads them at the
INSTALLED transformers version (PyPI sdist, cached under ~/.cache/mla-zoo/transformers-tests/) and
says where the generation and export tests come from (no PyPI package has them: without
$MLA_ZOO_TRANSFORMERS_SRC they are reported as one skip). Without a network the module is skipped.
Not run: PipelineTesterMixin (its tiny checkpoints live on the Hub), TensorParallelTesterMixin and
FSDPTesterMixin (multi-process; their tests/distributed_testing_utils.py is in no sdist).

Commands (from the repository root):

    # newest transformers (the README install)
    python -m pytest -q tests/test_transformers_suite.py
    # with the generation and torch.export / ONNX export tests, from a transformers source tree (git checkout)
    MLA_ZOO_TRANSFORMERS_SRC=/path/to/transformers RUN_SLOW=1 python -m pytest -q tests/test_transformers_suite.py
    # the lowest supported transformers, in a venv pinned to it (as CI does)
    python -m venv .venv-lowest && .venv-lowest/bin/pip install torch==2.13.0 transformers==5.17.0 -e ".[dev]"
    .venv-lowest/bin/python -m pytest -q tests/test_transformers_suite.py

On the 2-core machine: about 1-1.5 min per transformers version (plus ~20 s once per version for the
sdist), 2-2.5 min with the generation tests, 6-7 min with those and RUN_SLOW=1.
"""

from __future__ import annotations

import copy
import unittest
import warnings
from unittest import mock

import pytest
import torch
from transformers_suite import upstream

try:
    UPSTREAM = upstream.load()
except upstream.UpstreamUnavailable as e:
    pytest.skip(f"transformers' own test files cannot be had: {e}", allow_module_level=True)

from conftest import convert_tiny  # noqa: E402
from mla_zoo.modeling.convert import save_checkpoint  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.auto.modeling_auto import (  # noqa: E402
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)

with warnings.catch_warnings():  # upstream's marks (flash_attn_test, ...) are registered by its own conftest
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    from tests.generation.test_utils import GenerationTesterMixin
    from tests.test_modeling_common import ModelTesterMixin, ids_tensor
    from tests.test_training_mixin import TrainingTesterMixin

if UPSTREAM.source_dir is not None and UPSTREAM.source_version != UPSTREAM.version:
    warnings.warn(f"the generation and export tests are of transformers {UPSTREAM.source_version}, "
                  f"the installed transformers is {UPSTREAM.version}: {UPSTREAM.describe()}", stacklevel=1)

# Tests that cannot apply to this model, each with the reason (none today: transformers' own mixins skip
# what a text-only decoder on CPU cannot have). A name the installed mixins do not define is ignored.
SKIPS: dict[str, str] = {}


class LlamaMLAModelTester:
    """Shapes and inputs of the tiny model, in the style of transformers' DeepseekV3ModelTester.

    `config` is the converted checkpoint's own config; every test gets a fresh copy of it.
    """

    def __init__(self, parent, config, base_model_class, causal_lm_class, batch_size=13, seq_length=7,
                 is_training=True, use_input_mask=True):
        self.parent = parent
        self.config = config
        self.base_model_class = base_model_class
        self.causal_lm_class = causal_lm_class
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.num_hidden_layers = config.num_hidden_layers
        self.num_attention_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.pad_token_id = config.pad_token_id

    def get_config(self):
        return copy.deepcopy(self.config)

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)  # [B, S]
        input_mask = torch.tril(torch.ones_like(input_ids)) if self.use_input_mask else None  # [B, S], right-padded
        return self.get_config(), input_ids, input_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}

    def create_and_check_model(self, config, input_ids, input_mask):
        model = self.base_model_class(config).eval()
        result = model(input_ids, attention_mask=input_mask)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))


def tiny_llama_gqa() -> LlamaForCausalLM:
    """The source: a random Llama with grouped-query attention (4 query heads, 2 KV heads, head_dim 8)."""
    config = LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A converted checkpoint on disk: 2 of 4 RoPE pairs per KV head kept, a latent of 6 per KV head (12 of 24)."""
    mla, report = convert_tiny(tiny_llama_gqa(), rope_pairs=2, kv_rank_per_head=6)
    return save_checkpoint(mla, None, report, tmp_path_factory.mktemp("suite") / "ckpt")


@pytest.fixture(scope="class", autouse=True)
def remote_classes(request, checkpoint):
    """The classes of the checkpoint's remote code, loaded the way users load them (which also registers
    them with AutoModel / AutoModelForCausalLM, where some upstream tests look them up)."""
    lm = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    base = AutoModel.from_pretrained(checkpoint, trust_remote_code=True)
    # a config no model was built from yet (loading a model fixes its attention implementation)
    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    causal_lm_class, base_model_class = type(lm), type(base)
    for cls in (causal_lm_class, base_model_class, type(config)):
        assert cls.__module__.startswith("transformers_modules."), f"{cls} is not the checkpoint's remote code"
    cls = request.cls
    cls.config = config
    cls.base_model_class = base_model_class
    cls.all_model_classes = (base_model_class, causal_lm_class)
    cls.all_generative_model_classes = (causal_lm_class,)
    cls._torch_compile_train_cls = causal_lm_class  # used in `test_torch_compile_for_training`


class LlamaMLAModelTest(ModelTesterMixin, GenerationTesterMixin, TrainingTesterMixin, unittest.TestCase):
    # Need to use `0.8` instead of `0.9` for `test_cpu_offload`, as transformers' Llama test does
    model_split_percents = [0.5, 0.7, 0.8]

    def setUp(self):
        lm_class = self.all_generative_model_classes[0]
        self.model_tester = LlamaMLAModelTester(self, self.config, self.base_model_class, lm_class)
        # The mixins tell a base model from a causal LM by class name, in transformers' tables of its own
        # models (which models get labels, which find their RoPE layer): name ours there, as for a built-in model.
        for table, model_class in ((MODEL_MAPPING_NAMES, self.base_model_class),
                                   (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, lm_class)):
            names = mock.patch.dict(table, {self.config.model_type: model_class.__name__})
            names.start()
            self.addCleanup(names.stop)

    def _get_attention_shape(self, batch_size, seq_length, config):
        """The cache layout the generation tests check (upstream's hook for MLA models): the latent as the keys,
        [B, 1, T, kv_lora_rank], like DeepSeek; as the values the RoPE keys of EVERY KV head (MHA2MLA keeps
        one per KV head, DeepSeek one shared head), [B, 1, T, num_key_value_heads * qk_rope_head_dim]."""
        latent = (batch_size, 1, seq_length, config.kv_lora_rank)
        rope_keys = (batch_size, 1, seq_length, config.num_key_value_heads * config.qk_rope_head_dim)
        return latent, rope_keys

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_config(self):
        try:
            from tests.test_configuration_common import ConfigTester
        except ImportError as e:  # its helper tests/utils/test_configuration_utils.py is in no sdist
            self.skipTest(f"ConfigTester cannot be imported: {e}")
        ConfigTester(self, config_class=type(self.config)).run_common_tests()  # as transformers' Llama test does


for _name, _reason in SKIPS.items():
    if hasattr(LlamaMLAModelTest, _name):
        setattr(LlamaMLAModelTest, _name, unittest.skip(_reason)(getattr(LlamaMLAModelTest, _name)))


if UPSTREAM.stand_ins:

    @pytest.mark.skip(reason=UPSTREAM.missing_reason())
    def test_generation_and_export_mixins():
        """Stands for GenerationTesterMixin and ExportTesterMixin, whose files could not be had."""
