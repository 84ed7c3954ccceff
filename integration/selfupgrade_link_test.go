package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
)

// flipLink points link at target through a rename, as ln -sfn does in
// effect (atomically: the link never is missing).
func flipLink(t *testing.T, target, link string) {
	t.Helper()
	tmp := link + ".new"
	os.Remove(tmp)
	if err := os.Symlink(target, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, link); err != nil {
		t.Fatal(err)
	}
}

// Deploys ship releases side by side and flip a link (current →
// releases/N): upgrade --self re-executes the path upgrader was invoked
// by, resolved at the upgrade, and says which binary and version now run.
func TestSelfUpgradeFollowsASymlinkFlip(t *testing.T) {
	v2 := upgraderV2(t)
	dir := t.TempDir()
	for _, d := range []string{"rel1", "rel2", "bin"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	rel1, rel2 := filepath.Join(dir, "rel1", "upgrader"), filepath.Join(dir, "rel2", "upgrader")
	installBin(t, upgraderBin, rel1)
	installBin(t, v2, rel2)
	link := filepath.Join(dir, "bin", "upgrader")
	flipLink(t, "../rel1/upgrader", link)
	ctl := filepath.Join(dir, "control.sock")
	cmd := exec.Command(link, "run", "--log-format", "json", "--log-level", "debug", "--control", ctl, "-l", "127.0.0.1:0", "--", helloBin)
	cmd.Dir = dir
	p := startProc(t, cmd, ctl)
	p.waitReady(1)
	l := startLoad(loadgen.Config{Addr: p.addr(""), Clients: 8, Mode: loadgen.KeepAlive})
	for i, c := range []struct{ target, bin, version string }{
		{"../rel2/upgrader", rel2, "v2"},
		{"../rel1/upgrader", rel1, "dev"}, // and back: the link, not what it named, is carried
	} {
		flipLink(t, c.target, link)
		out, err := p.selfUpgrade(true)
		if err != nil {
			t.Fatalf("self-upgrade %d after the flip to %s: %v\n%s", i+1, c.target, err, out)
		}
		if !strings.Contains(out, "upgrader "+c.version+" resumed from "+c.bin) {
			t.Fatalf("self-upgrade %d: output %q does not say upgrader %s resumed from %s", i+1, out, c.version, c.bin)
		}
		st := p.status()
		if st.Pid != p.pid || st.Version != c.version || st.Execs != i+1 {
			t.Fatalf("after the flip to %s and self-upgrade %d: pid %d version %q execs %d, want pid %d version %q execs %d",
				c.target, i+1, st.Pid, st.Version, st.Execs, p.pid, c.version, i+1)
		}
		if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", p.pid)); err != nil || exe != c.bin {
			t.Fatalf("after self-upgrade %d: /proc/PID/exe %q (%v), want %s", i+1, exe, err, c.bin)
		}
		l.waitServed(t, 1, 20)
	}
	requireNoFailures(t, l.stop())
}
