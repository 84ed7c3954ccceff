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
		"/usr/share/doc/upgrader/copyright":                           "-rw-r--r--",
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
	for _, sub := range []string{"run", "upgrade", "status", "prestop", "stop"} {
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

	checkCopyright(t, filepath.Join(root, "usr/share/doc/upgrader/copyright"))
	if !strings.Contains(man, "\n.SH COPYRIGHT\n") || !strings.Contains(man, "Apache License, Version 2.0") {
		t.Errorf("the man page has no COPYRIGHT section naming the Apache License, Version 2.0")
	}

	units, _ := filepath.Glob(filepath.Join(root, "lib/systemd/system/*"))
	if len(units) != len(srcUnits) {
		t.Fatalf("extracted units %v; want the %d in packaging/systemd", units, len(srcUnits))
	}
	verifyUnits(t, units, upgrader, filepath.Join(root, unitHelloPath))
}

// checkCopyright checks the package's copyright file against Debian's
// machine-readable format (copyright-format 1.0): a header paragraph, a
// "Files: *" paragraph whose license is Apache-2.0, and a standalone
// Apache-2.0 license paragraph pointing to Debian's copy of the text. The
// repository's LICENSE must be that text with only the appendix's
// copyright line filled in, with the copyright the file declares, so that
// the two cannot drift apart.
func checkCopyright(t *testing.T, path string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	paras := parseDeb822(t, string(b))
	if len(paras) < 3 {
		t.Fatalf("%s: %d paragraphs, want a header, a Files: * and a License: Apache-2.0 one:\n%s", path, len(paras), b)
	}
	head := paras[0]
	if got, want := head["Format"], "https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"; got != want {
		t.Errorf("%s: Format: %q, want %q", path, got, want)
	}
	if got := head["Upstream-Name"]; got != "upgrader" {
		t.Errorf("%s: Upstream-Name: %q, want upgrader", path, got)
	}
	if !strings.HasPrefix(head["Source"], "https://") {
		t.Errorf("%s: Source: %q, want the upstream URL", path, head["Source"])
	}
	var copyright string
	var files, license bool
	for _, p := range paras[1:] {
		switch {
		case p["Files"] == "*":
			files, copyright = true, p["Copyright"]
			if p["License"] != "Apache-2.0" {
				t.Errorf("%s: Files: * has License: %q, want Apache-2.0", path, p["License"])
			}
		case p["Files"] == "" && strings.HasPrefix(p["License"], "Apache-2.0\n"):
			license = true
			if !strings.Contains(p["License"], "/usr/share/common-licenses/Apache-2.0") {
				t.Errorf("%s: the License: Apache-2.0 paragraph does not point to /usr/share/common-licenses/Apache-2.0:\n%s", path, p["License"])
			}
		}
	}
	if !files || copyright == "" {
		t.Errorf("%s: no Files: * paragraph with a Copyright: field:\n%s", path, b)
	}
	if !license {
		t.Errorf("%s: no standalone License: Apache-2.0 paragraph with the license's text or a pointer to it:\n%s", path, b)
	}

	apache, err := os.ReadFile("/usr/share/common-licenses/Apache-2.0")
	if err != nil {
		t.Fatalf("Debian's copy of the Apache License (package base-files): %v", err)
	}
	mine, err := os.ReadFile(filepath.Join(repoRoot, "LICENSE"))
	if err != nil {
		t.Fatal(err)
	}
	want := strings.Replace(string(apache), "Copyright [yyyy] [name of copyright owner]", "Copyright "+copyright, 1)
	if string(mine) != want {
		t.Errorf("LICENSE is not the text of /usr/share/common-licenses/Apache-2.0 with its appendix's copyright line reading %q", "Copyright "+copyright)
	}
}

// parseDeb822 splits a deb822 file (Debian's control-file syntax) into
// paragraphs of fields. A field's continuation lines are joined with
// newlines, without their leading space; a lone "." stands for an empty
// line.
func parseDeb822(t *testing.T, text string) []map[string]string {
	t.Helper()
	var paras []map[string]string
	var p map[string]string
	var last string
	for i, l := range strings.Split(text, "\n") {
		switch {
		case strings.TrimSpace(l) == "":
			p = nil
		case l[0] == ' ' || l[0] == '\t':
			if p == nil {
				t.Fatalf("deb822 line %d %q: a continuation line outside a field", i+1, l)
			}
			c := strings.TrimSpace(l)
			if c == "." {
				c = ""
			}
			p[last] += "\n" + c
		default:
			name, value, ok := strings.Cut(l, ":")
			if !ok {
				t.Fatalf("deb822 line %d %q: want Name: value", i+1, l)
			}
			if p == nil {
				p = map[string]string{}
				paras = append(paras, p)
			}
			if _, dup := p[name]; dup {
				t.Fatalf("deb822 line %d: field %s twice in one paragraph", i+1, name)
			}
			last, p[name] = name, strings.TrimSpace(value)
		}
	}
	return paras
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
