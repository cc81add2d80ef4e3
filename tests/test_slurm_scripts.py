"""Static checks of slurm/up.sh (no Slurm needed, nothing is run): the security properties of issue #13
cannot regress unnoticed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

UP = Path(__file__).resolve().parents[1] / "slurm" / "up.sh"


def _text() -> str:
    return UP.read_text()


def _logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined."""
    return text.replace("\\\n", " ").splitlines()


def test_up_sh_parses():
    assert subprocess.run(["bash", "-n", str(UP)], capture_output=True).returncode == 0


def test_mariadb_listens_on_no_network_interface():
    starts = [ln for ln in _logical_lines(_text()) if re.search(r"/usr/sbin/mariadbd\b", ln)]
    assert starts, "mariadbd start line not found"
    for ln in starts:
        assert "--bind-address=127.0.0.1" in ln, ln
        assert "--skip-networking" in ln, ln


def test_slurmdbd_conf_is_never_readable_by_others():
    """Every write of $SLURMDBD_CONF content goes to a file created 0600 (umask 077 / mktemp) that is then
    renamed over the conf; nothing redirects into the conf itself (truncating keeps an old mode)."""
    text = _text()
    assert not re.search(r'>\s*"?\$SLURMDBD_CONF"?(\s|$)', text), "content must not be written into the conf in place"
    tmp = re.search(r'(\w+)=\$\(umask 077 && mktemp "\$SLURMDBD_CONF\.XXXXXX"\)', text)
    assert tmp, "the new conf must be created under umask 077"
    var = tmp.group(1)
    write = re.search(rf'\(umask 077 && printf [^\n]*"\$dbd_conf" >"\${var}"\)', text)
    move = re.search(rf'mv -f "\${var}" "\$SLURMDBD_CONF"', text)
    assert write and move and tmp.start() < write.start() < move.start()
    assert text.index(f'chmod 600 "${var}"') < move.start()


def test_reused_db_password_is_validated_before_sql():
    text = _text()
    m = re.search(r"DB_PASS_RE='(\^\[A-Za-z0-9\]\{16,64\}\$)'", text)
    assert m, "the password alphabet must be a fixed [A-Za-z0-9] pattern"
    reuse = text.index("sed -n 's/^StoragePass=//p'")
    check = text.index('! "$DB_PASS" =~ $DB_PASS_RE')
    final = text.index('[[ "$DB_PASS" =~ $DB_PASS_RE ]] || die')
    sql = text.index("IDENTIFIED BY '$DB_PASS'")
    assert reuse < check < final < sql
    pattern = re.compile(m.group(1))
    for bad in ("x'; DROP DATABASE slurm_acct_db; --", "short", "a" * 15 + "'", "pass word with spaces!!"):
        assert not pattern.fullmatch(bad)
    assert pattern.fullmatch("A" * 24)
