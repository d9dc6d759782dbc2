"""ETTProcessor / ETTImageProcessor for transformers (AutoProcessor with trust_remote_code). Imports only torch and
transformers.

Text: the chat template (chat_template.jinja) renders a conversation in the training layout with one
IMAGE_PLACEHOLDER string per image; the processor splits the text at the special-token strings, encodes each
text piece alone (as data_pipeline/layouts.py's SequenceBuilder encodes each segment) and replaces each image
placeholder by `image_span`, the span ids training used (written at export time from data_pipeline/layouts.py).
Batches are padded on the left, for generation.

Images: RGB, centre crop to the trained aspect, antialiased bilinear resize in torch's uint8 kernel, x / 127.5 - 1:
data_pipeline/processing.decode_image followed by training/infer.load_image, for decoded (PIL) images.
"""

import re

import torch
import torch.nn.functional as F
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor


class ETTImageProcessor(BaseImageProcessor):
    """PIL images -> pixel_values [M, 3, H, W] in [-1, 1] at `image_size` (H, W)."""

    model_input_names = ["pixel_values"]

    def __init__(self, image_size=(32, 32), **kwargs):
        super().__init__(**kwargs)
        self.image_size = list(image_size)

    def to_tensor(self, image) -> torch.Tensor:
        """One PIL image -> uint8 [3, H, W]: centre crop to the aspect of image_size, then resize."""
        if not hasattr(image, "convert"):
            raise ValueError(f"images must be PIL images, got {type(image).__name__}")
        height, width = self.image_size
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3)
        src_h, src_w = pixels.shape[:2]
        crop_w = min(src_w, round(src_h * width / height))
        crop_h = min(src_h, round(crop_w * height / width))
        top, left = (src_h - crop_h) // 2, (src_w - crop_w) // 2
        chw = pixels[top : top + crop_h, left : left + crop_w].permute(2, 0, 1)
        if chw.shape[1:] != (height, width):
            chw = F.interpolate(chw[None], size=(height, width), mode="bilinear", antialias=True)[0]
        return chw.contiguous()

    def preprocess(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        images = images if isinstance(images, (list, tuple)) else [images]
        pixels = torch.stack([self.to_tensor(image).float().div(127.5).sub(1.0) for image in images])
        return BatchFeature({"pixel_values": pixels}, tensor_type=return_tensors)


class ETTProcessor(ProcessorMixin):
    """text (rendered by the chat template) + images -> input_ids, attention_mask [B, S] (left-padded) and
    pixel_values [M, 3, H, W], the images in text order. `image_span`: the ids one image becomes;
    `image_token`: the placeholder string the chat template writes per image; `special_tokens`: the special-token
    strings (data_pipeline/text_tokenizer.py), never produced from plain text."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_span=None,
        image_token="<|image|>",
        special_tokens=None,
        t2i_prompt_format="{prompt}",
        t2i_unconditional="",
        **kwargs,
    ):
        self.image_span = list(image_span or [])
        self.image_token = image_token
        self.special_tokens = list(special_tokens or [])
        self.t2i_prompt_format = t2i_prompt_format
        self.t2i_unconditional = t2i_unconditional
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def encode_text(self, text: str) -> tuple[list[int], int]:
        """One rendered prompt -> (token ids with each image placeholder expanded to image_span, image count)."""
        pattern = "(" + "|".join(re.escape(token) for token in self.special_tokens) + ")"
        ids, images = [], 0
        for piece in re.split(pattern, text):
            if piece == self.image_token:
                ids += self.image_span
                images += 1
            elif piece in self.special_tokens:
                ids.append(self.tokenizer.convert_tokens_to_ids(piece))
            elif piece:
                ids += self.tokenizer.encode(piece, add_special_tokens=False)
        return ids, images

    def __call__(
        self, images=None, text=None, padding=True, padding_side="left", return_tensors="pt", **kwargs
    ):
        """text: a string or a list of strings (one per sample); images: the images of all samples in text order
        (a flat list, or one list per sample). Empty `videos` / `audios` (as evaluation harnesses pass) are
        accepted; anything else is rejected."""
        for name in ("videos", "audios"):
            if kwargs.get(name):
                raise ValueError(
                    f"ETTProcessor: `{name}` are not supported; the model reads images and text only"
                )
        texts = [text] if isinstance(text, str) else list(text or [])
        if not texts:
            raise ValueError(
                "ETTProcessor needs `text` (a string or a list of strings, e.g. from apply_chat_template)"
            )
        images = [] if images is None else images if isinstance(images, (list, tuple)) else [images]
        images = [
            image for group in images for image in (group if isinstance(group, (list, tuple)) else [group])
        ]
        encoded = [self.encode_text(t) for t in texts]
        placeholders = sum(count for _, count in encoded)
        if len(images) != placeholders:
            raise ValueError(
                f"ETTProcessor got {len(images)} images for {placeholders} image placeholders "
                f"({self.image_token!r}) in `text`: give one image per placeholder, in order"
            )
        rows = [ids for ids, _ in encoded]
        longest = max(len(ids) for ids in rows)
        if not padding and any(len(ids) != longest for ids in rows):
            raise ValueError("ETTProcessor: texts of different lengths need padding=True")
        if padding_side not in ("left", "right"):
            raise ValueError(f"ETTProcessor: padding_side must be 'left' or 'right', got {padding_side!r}")
        pad = self.tokenizer.pad_token_id
        input_ids, attention_mask = [], []
        for ids in rows:
            fill = longest - len(ids)
            if padding_side == "left":
                input_ids.append([pad] * fill + ids)
                attention_mask.append([0] * fill + [1] * len(ids))
            else:
                input_ids.append(ids + [pad] * fill)
                attention_mask.append([1] * len(ids) + [0] * fill)
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if images:
            data["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
        return BatchFeature(data, tensor_type=return_tensors)

    def text_to_image_inputs(self, prompt: str, return_tensors="pt") -> BatchFeature:
        """A text prompt -> input_ids [1, S] (BOS, prompt, IMAGE_START) and unconditional_ids [1, S'] (BOS,
        IMAGE_START), the t2i layout up to the first image code, for ETTForConditionalGeneration.generate_images."""
        data = {
            "input_ids": [self.encode_text(self.t2i_prompt_format.format(prompt=prompt))[0]],
            "unconditional_ids": [self.encode_text(self.t2i_unconditional)[0]],
        }
        return BatchFeature(data, tensor_type=return_tensors)
