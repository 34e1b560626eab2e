"""Using a trained model, as library functions: load a checkpoint or Hugging Face directory,
generate text, measure perplexity, analyse what the experts do."""
