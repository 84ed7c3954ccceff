package integration

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
)

// TestPackageDeb builds the Debian package with scripts/package and checks
// what an operator would install, without installing it: the control
// fields, every file with its mode, a static upgrader that runs, a man page
// that describes every flag, and units that systemd-analyze verify passes
// with the paths moved under the extracted root.
func TestPackageDeb(t *testing.T) {
	if _, err := exec.LookPath("dpkg-deb"); err != nil {
		t.Skip("dpkg-deb not installed (Debian package dpkg; scripts/deps installs it): not checking scripts/package's .deb")
	}
	out := t.TempDir()
	cmd := exec.Command("bash", "scripts/package", out)
	cmd.Dir, cmd.Stderr = repoRoot, os.Stderr
	printed, err := cmd.Output()
	if err != nil {
		t.Fatalf("scripts/package: %v\n%s", err, printed)
	}
	debs, _ := filepath.Glob(filepath.Join(out, "*.deb"))
	if len(debs) != 1 || strings.TrimSpace(string(printed)) != debs[0] {
		t.Fatalf("scripts/package printed %q; %s holds %v, want that one .deb", printed, out, debs)
	}
	deb := debs[0]

	info := dpkgDeb(t, "--info", deb)
	for _, want := range []string{"Package: upgrader", "Architecture: " + runtime.GOARCH, "Maintainer: ", "Description: "} {
		if !strings.Contains(info, "\n "+want) {
			t.Errorf("dpkg-deb --info has no %q:\n%s", want, info)
		}
	}
	if strings.Contains(info, "Depends:") {
		t.Errorf("the package depends on something; a static upgrader needs nothing:\n%s", info)
	}

	// Every file the package installs, with its mode and owner.
	files := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(dpkgDeb(t, "--contents", deb)), "\n") {
		f := strings.Fields(l)
		if len(f) < 6 || f[1] != "root/root" {
			t.Fatalf("dpkg-deb --contents line %q: want mode root/root size date time path", l)
		}
		if f[0][0] != 'd' {
			files[strings.TrimPrefix(f[5], ".")] = f[0]
		}
	}
	want := map[string]string{
		unitUpgraderPath:                                              "-rwxr-xr-x",
		unitHelloPath:                                                 "-rwxr-xr-x",
		"/usr/share/man/man1/upgrader.1.gz":                           "-rw-r--r--",
		"/usr/share/doc/upgrader/README.md":                           "-rw-r--r--",
		"/usr/share/doc/upgrader/examples/haproxy.cfg":                "-rw-r--r--",
		"/usr/share/doc/upgrader/examples/kubernetes-deployment.yaml": "-rw-r--r--",
	}
	srcUnits, _ := filepath.Glob(filepath.Join(repoRoot, "packaging", "systemd", "*"))
	for _, u := range srcUnits {
		want["/lib/systemd/system/"+filepath.Base(u)] = "-rw-r--r--"
	}
	for p, mode := range want {
		if files[p] != mode {
			t.Errorf("%s in the package: mode %q, want %q", p, files[p], mode)
		}
	}
	for p := range files {
		if _, ok := want[p]; !ok {
			t.Errorf("%s in the package: not expected", p)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	root := t.TempDir()
	dpkgDeb(t, "-x", deb, root)
	upgrader := filepath.Join(root, unitUpgraderPath)
	if out, err := exec.Command(upgrader, "--help").CombinedOutput(); err != nil {
		t.Fatalf("packaged upgrader --help: %v\n%s", err, out)
	}
	if out, _ := exec.Command(upgrader, "version").Output(); !strings.HasPrefix(string(out), "upgrader ") || strings.TrimSpace(string(out)) == "upgrader dev" {
		t.Errorf("packaged upgrader version: %q, want the version scripts/package set", out)
	}
	for _, bin := range []string{upgrader, filepath.Join(root, unitHelloPath)} {
		assertStatic(t, bin)
	}

	// The man page describes every flag the commands take.
	man := readGzip(t, filepath.Join(root, "usr/share/man/man1/upgrader.1.gz"))
	flagRE := regexp.MustCompile(`--[a-z][a-z-]*`)
	for _, sub := range []string{"run", "upgrade", "status", "prestop"} {
		help, _ := exec.Command(upgrader, sub, "--help").CombinedOutput() // pflag may exit 1 on --help
		flags := flagRE.FindAllString(string(help), -1)
		if len(flags) == 0 {
			t.Fatalf("upgrader %s --help lists no flags:\n%s", sub, help)
		}
		for _, f := range flags {
			if f != "--help" && !strings.Contains(man, strings.ReplaceAll(f, "-", `\-`)) {
				t.Errorf("the man page does not describe upgrader %s %s", sub, f)
			}
		}
	}

	units, _ := filepath.Glob(filepath.Join(root, "lib/systemd/system/*"))
	if len(units) != len(srcUnits) {
		t.Fatalf("extracted units %v; want the %d in packaging/systemd", units, len(srcUnits))
	}
	verifyUnits(t, units, upgrader, filepath.Join(root, unitHelloPath))
}

// dpkgDeb runs dpkg-deb with args and returns its output, or fails.
func dpkgDeb(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("dpkg-deb", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("dpkg-deb %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// assertStatic fails unless path is an ELF executable with no program
// interpreter: statically linked, so that the package needs no libc.
func assertStatic(t *testing.T, path string) {
	t.Helper()
	f, err := elf.Open(path)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Errorf("%s is dynamically linked (PT_INTERP); scripts/package builds with CGO_ENABLED=0", path)
		}
	}
}

// readGzip returns the decompressed contents of a gzip file.
func readGzip(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	r, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	s, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return string(s)
}
