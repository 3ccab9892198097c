"""Print the README's support table by running every pass on every tiny family (see qcompile.analysis.support).

    python benchmarks/support_table.py [ARCH ...] > table.md
"""

import sys

from qcompile.analysis.support import table

if __name__ == "__main__":
    print(table(sys.argv[1:] or None))
