package main

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"syscall"
	"time"

	flag "github.com/spf13/pflag"
)

// upgradeCmd asks a running supervisor to upgrade, by its pid file.
func upgradeCmd(args []string) error {
	fs := flag.NewFlagSet("upgrader upgrade", flag.ContinueOnError)
	pidFile := fs.String("pid-file", "", "the supervisor's --pid-file")
	_ = fs.Duration("timeout", 2*time.Minute, "how long to follow the upgrade")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if *pidFile == "" {
		return fmt.Errorf("%w: upgrade needs --pid-file PATH", errUsage)
	}
	b, err := os.ReadFile(*pidFile)
	if err != nil {
		return fmt.Errorf("--pid-file: %w", err)
	}
	pid, err := strconv.Atoi(string(bytes.TrimSpace(b)))
	if err != nil || pid <= 1 {
		return fmt.Errorf("--pid-file %s: %q is not a pid", *pidFile, bytes.TrimSpace(b))
	}
	if err := syscall.Kill(pid, syscall.SIGUSR2); err != nil {
		return fmt.Errorf("signal supervisor pid %d: %w", pid, err)
	}
	fmt.Printf("upgrade requested from supervisor pid %d\n", pid)
	return nil
}

func statusCmd(args []string) error {
	return fmt.Errorf("status needs the control socket, which this version does not have yet")
}
