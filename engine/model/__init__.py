"""The Llama forward pass over two seams: quantised linears and paged attention."""
