"""The benchmark registry, importable without any benchmark module (the CLI's ``--format`` choices)."""

BENCHMARKS: dict[str, str] = {
    "mathvista": "deltakit.benchmarks.mathvista:MathVista",
    "mathverse": "deltakit.benchmarks.mathverse:MathVerse",
    "mathvision": "deltakit.benchmarks.mathvision:MathVision",
    "wemath": "deltakit.benchmarks.wemath:WeMath",
    "logicvista": "deltakit.benchmarks.logicvista:LogicVista",
    "deltakit": "deltakit.benchmarks.native:Native",
}
"""Benchmark name -> ``module:class``, in the order schemas are tried (the first whose ``detect`` accepts wins)."""

NAMES = tuple(BENCHMARKS)
