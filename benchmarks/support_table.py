"""Print the README's support table, then every ✘ with its reason, by running every pass on every tiny family
(see qcompile.analysis.support; tests/graph/test_archs.py proves the same runs and checks the README against them).

    python benchmarks/support_table.py [ARCH ...] > table.md
"""

import sys

from qcompile.analysis.support import table

if __name__ == "__main__":
    print(table(sys.argv[1:] or None))
