__all__: list = []  # placeholder: filled in by this family's contracts
