"""ETTForConditionalGeneration for transformers (AutoModelForImageTextToText / AutoModel with trust_remote_code).

The LLM is transformers' own Qwen2ForCausalLM / LlamaForCausalLM (`language_model`, built from config.text_config);
the vision tokenizer is the repository's VQTokenizer (modeling/tokenizer/, copied next to this file with the
codebook kernels' torch path, modeling/kernels/__init__.py as kernels.py and reference.py); the projector is
modeling/projector.py. Imports only torch and transformers (and those files).

Images enter the LLM as in training (modeling/ett.py): pixel_values -> code ids -> projector(codebook[ids]) (or
the index embedding of the `index` baseline) scattered into the text embeddings at the image placeholder
positions, row-major. Text generation delegates to the language model's generate with those inputs_embeds, so it
uses transformers' KV cache and left-padded batches; text-to-image walks the code grid as
modeling/generation_t2i.py does.
"""

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from .configuration_ett import ETTConfig
from .projector import Projector, ProjectorConfig
from .sampling import sample
from .tokenizer import TokenizerConfig, VQTokenizer


class ETTForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = ETTConfig
    base_model_prefix = ""
    _keep_in_fp32_modules_strict = ["vision_tokenizer"]
    _no_split_modules = ["VQTokenizer"]
    _supports_sdpa = True

    def __init__(self, config: ETTConfig):
        super().__init__(config)
        text = config.text_config
        tokenizer_config = TokenizerConfig.from_dict(config.vision_config)
        self.language_model = AutoModelForCausalLM.from_config(text)
        self.vision_tokenizer = VQTokenizer(tokenizer_config)
        hidden, codes = text.hidden_size, tokenizer_config.codebook_size
        if config.visual_input == "embedding":
            self.projector = Projector(
                ProjectorConfig(config.projector_depth), tokenizer_config.code_dim, hidden
            )
        else:
            self.index_embedding = nn.Embedding(codes, hidden)
        if config.visual_head:
            self.visual_head = nn.Linear(hidden, codes, bias=False)
        self.post_init()

    def _init_weights(self, module):
        """The quantizer's code ids are a non-persistent buffer, absent from the weights: rebuild them."""
        if hasattr(module, "code_ids"):
            module.code_ids = torch.arange(module.codebook_size, device=module.code_ids.device)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        height, width = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, height, width):
            raise ValueError(
                f"pixel_values has shape {list(pixel_values.shape)}, expected [M, 3, {height}, {width}] (the image "
                "size the model was trained at, config.image_size); ETTProcessor resizes images to it"
            )

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [M, 3, H, W] in [-1, 1] -> code ids [M, h, w]."""
        self._check_pixel_values(pixel_values)
        return self.vision_tokenizer.encode(pixel_values.to(self.vision_tokenizer.codebook.dtype))

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """code ids [M, h, w] -> images [M, 3, H, W] in [-1, 1] (unclamped)."""
        return self.vision_tokenizer.decode_indices(codes)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """code ids [...] -> LLM input embeddings [..., C]: projector(codebook[ids]), or the index embedding."""
        if self.config.visual_input == "index":
            return self.index_embedding(codes)
        weight = self.projector.mlp[0].weight
        return self.projector(self.vision_tokenizer.quantizer.embed(codes).to(weight.dtype))

    def _inputs_embeds(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """input_ids [B, S] -> [B, S, C] with the images' embeddings (row-major) at the placeholder positions."""
        embeds = self.get_input_embeddings()(input_ids)
        placeholders = input_ids == self.config.image_token_id
        per_image = self.config.grid[0] * self.config.grid[1]
        images = 0 if pixel_values is None else pixel_values.shape[0]
        if int(placeholders.sum()) != images * per_image:
            raise ValueError(
                f"input_ids hold {int(placeholders.sum())} image placeholder tokens ({per_image} per image) but "
                f"pixel_values has {images} images: give one image per image span (ETTProcessor expands each "
                "image of a message into its span)"
            )
        if not images:
            return embeds
        image_embeds = self.embed_codes(self.encode_images(pixel_values)).reshape(-1, embeds.shape[-1])
        return embeds.masked_scatter(placeholders.unsqueeze(-1), image_embeds.to(embeds.dtype))

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, inputs_embeds=None, **kwargs):
        """The language model's forward (logits [B, S, V], loss with `labels`) on the text + image embeddings."""
        if inputs_embeds is None:
            inputs_embeds = self._inputs_embeds(input_ids, pixel_values)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, **kwargs) -> torch.LongTensor:
        """input_ids [B, S] (left-padded, from ETTProcessor), pixel_values [M, 3, H, W] -> [B, S + n]: the prompt
        followed by the generated tokens, as transformers' generate returns for input_ids. Other arguments go to
        the language model's generate (max_new_tokens, do_sample, eos_token_id, ...)."""
        new_tokens = self.language_model.generate(
            inputs_embeds=self._inputs_embeds(input_ids, pixel_values),
            attention_mask=attention_mask,
            **kwargs,
        )
        return torch.cat([input_ids, new_tokens.to(input_ids.device)], dim=1)

    def _last_hidden(self, cache, **inputs) -> torch.Tensor:
        """One step of the language model's decoder with `cache` -> hidden state of the last position [1, C]."""
        return self.language_model.model(**inputs, past_key_values=cache, use_cache=True).last_hidden_state[
            :, -1
        ]

    @torch.no_grad()
    def generate_images(
        self,
        input_ids: torch.Tensor,
        unconditional_ids: torch.Tensor | None = None,
        guidance_scale: float = 3.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text to image with the visual head, as modeling/generation_t2i.py samples: input_ids [1, S] (BOS, prompt,
        IMAGE_START) and unconditional_ids [1, S'] (BOS, IMAGE_START) from ETTProcessor.text_to_image_inputs;
        logits = uncond + s * (cond - uncond); the same seed gives the same image. Returns (images [1, 3, H, W],
        codes [1, h, w])."""
        from transformers import DynamicCache

        if not self.config.visual_head:
            raise ValueError(
                "generate_images needs a visual head (config.visual_head is false for this export)"
            )
        if guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {guidance_scale}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        guided = guidance_scale != 1.0
        if guided and unconditional_ids is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs unconditional_ids (BOS, IMAGE_START)")
        prompts = [input_ids] + ([unconditional_ids] if guided else [])
        caches = [DynamicCache(config=self.config.text_config) for _ in prompts]
        hidden = [self._last_hidden(cache, input_ids=ids) for cache, ids in zip(caches, prompts)]
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        height, width = self.config.grid
        codes = torch.empty(height, width, dtype=torch.long, device=input_ids.device)
        row_end = torch.full((1, 1), self.config.row_end_id, dtype=torch.long, device=input_ids.device)
        for row in range(height):
            for col in range(width):
                logits = self.visual_head(hidden[0]).float()
                if guided:
                    uncond = self.visual_head(hidden[1]).float()
                    logits = uncond + guidance_scale * (logits - uncond)
                code = sample(logits / temperature, top_k, top_p, generator)
                codes[row, col] = code[0]
                if (row, col) != (height - 1, width - 1):
                    embeds = self.embed_codes(code.view(1, 1)).to(self.get_input_embeddings().weight.dtype)
                    hidden = [self._last_hidden(cache, inputs_embeds=embeds) for cache in caches]
            if row + 1 < height:
                hidden = [self._last_hidden(cache, input_ids=row_end) for cache in caches]
        return self.decode_codes(codes[None]), codes[None]
