"""Separable-axis leaves (being written)."""


class SeparableLeaves:
    @staticmethod
    def build(plan, positions):
        return None
