package wireguard

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// KeyFile is the private key's file name in the state directory: flannel's name and format
// (the key in base64, as `wg genkey` prints it), so a host moving from flannel can copy
// /run/flannel/wgkey over and keep the identity its peers know.
const KeyFile = "wgkey"

// hostKey is this host's WireGuard identity: read from path when it exists, otherwise made
// up in memory by loadKey and written by save (Setup), since a constructor must not change
// the host.
type hostKey struct {
	path    string
	private wgtypes.Key
	public  wgtypes.Key
	saved   bool // path holds private
}

// loadKey reads the key at path, or generates one when there is none yet. A key file readable
// by others than its owner is tightened to 0600 with a warning: the key is the host's
// identity in the overlay, whoever reads it can impersonate the host to every peer.
func loadKey(path string, log *slog.Logger) (hostKey, error) {
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			return hostKey{}, fmt.Errorf("generate a private key: %w", err)
		}
		return hostKey{path: path, private: k, public: k.PublicKey()}, nil
	case err != nil:
		return hostKey{}, fmt.Errorf("read the private key: %w", err)
	}
	k, err := wgtypes.ParseKey(strings.TrimSpace(string(data)))
	if err != nil {
		return hostKey{}, fmt.Errorf("private key file %s: %w (remove it to have a new key generated; peers learn the new public key from our lease)", path, err)
	}
	if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 {
		log.Warn("private key file was readable by others; restricting it to its owner", "path", path, "mode", fi.Mode().Perm())
		if err := os.Chmod(path, 0o600); err != nil {
			return hostKey{}, fmt.Errorf("restrict private key file %s to 0600: %w", path, err)
		}
	}
	return hostKey{path: path, private: k, public: k.PublicKey(), saved: true}, nil
}

// save writes a generated key, 0600, through a temporary file and a rename, so a crash never
// leaves half a key behind. A key read from the file is not written again.
func (k *hostKey) save() error {
	if k.saved {
		return nil
	}
	dir := filepath.Dir(k.path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create state directory %s: %w", dir, err)
	}
	f, err := os.CreateTemp(dir, "."+KeyFile+".*") // created 0600
	if err != nil {
		return fmt.Errorf("write private key: %w", err)
	}
	tmp := f.Name()
	_, err = f.WriteString(k.private.String())
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, k.path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write private key %s: %w", k.path, err)
	}
	k.saved = true
	return nil
}
