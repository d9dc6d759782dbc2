"""ETTConfig for transformers (AutoConfig with trust_remote_code): the LLM's Qwen2 / Llama config, the vision
tokenizer's TokenizerConfig fields and how images enter the LLM. Imports only transformers; written into the
export's config.json by training/hf_model/__init__.py."""

from transformers import AutoConfig, PretrainedConfig


class ETTConfig(PretrainedConfig):
    """text_config: the LLM (a Qwen2Config / LlamaConfig dict). vision_config: TokenizerConfig.to_dict().
    visual_input "embedding" (projector over codebook embeddings) or "index" (a learned K x C table).
    image_size (H, W) is the size training used; grid (h, w) its code grid. The special token ids are the text
    tokenizer's (data_pipeline/text_tokenizer.py)."""

    model_type = "ett"
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        text_config=None,
        vision_config=None,
        visual_input="embedding",
        projector_depth=2,
        visual_head=False,
        image_size=(32, 32),
        grid=(4, 4),
        image_token_id=None,
        image_start_id=None,
        row_end_id=None,
        image_end_id=None,
        **kwargs,
    ):
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        self.vision_config = vision_config or {}
        if visual_input not in ("embedding", "index"):
            raise ValueError(f"ETTConfig.visual_input must be 'embedding' or 'index', got {visual_input!r}")
        self.visual_input = visual_input
        self.projector_depth = projector_depth
        self.visual_head = visual_head
        self.image_size = list(image_size)
        self.grid = list(grid)
        self.image_token_id = image_token_id
        self.image_start_id = image_start_id
        self.row_end_id = row_end_id
        self.image_end_id = image_end_id
        super().__init__(**kwargs)
