"""Pure nn.Modules: the LLM, the VQ tokenizer, the codebook kernels, the projector and the ETT model."""
