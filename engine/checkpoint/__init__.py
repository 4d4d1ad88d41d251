"""GPTQ checkpoint loading (local folder or hub), synthesis, and the weight types they share."""
