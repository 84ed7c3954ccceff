// Command package builds upgrader's Debian package with nfpm's deb packager,
// from packaging/nfpm.yaml. scripts/package runs it; see there.
//
// It is a module of its own, so that nfpm and what it needs stay out of
// upgrader's go.mod, and it uses nfpm as a library rather than nfpm's
// command, which would also build the rpm and msix packagers.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/goreleaser/nfpm/v2"
	"github.com/goreleaser/nfpm/v2/deb"
)

func main() {
	config := flag.String("f", "packaging/nfpm.yaml", "nfpm configuration; ${VAR}s in it come from the environment")
	out := flag.String("o", "dist", "directory to write the .deb to")
	flag.Parse()
	if err := build(*config, *out); err != nil {
		fmt.Fprintln(os.Stderr, "package:", err)
		os.Exit(1)
	}
}

func build(config, out string) error {
	c, err := nfpm.ParseFile(config)
	if err != nil {
		return err
	}
	info, err := c.Get("deb")
	if err != nil {
		return err
	}
	info = nfpm.WithDefaults(info)
	if err := nfpm.Validate(info); err != nil {
		return err
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	path := filepath.Join(out, deb.Default.ConventionalFileName(info))
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := deb.Default.Package(info, f); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	fmt.Println(path)
	return nil
}
