"""PyTorch interop: the official state-dict layout (torch_keys), a PyTorch reference of the
official architecture (torch_reference, needs torch) and checkpoint converters (converters)."""
