package fwrules

import (
	"context"
	"sync"
)

// Snapshot is the iptables rules as read once for everyone who looks at them after one change
// (Monitor hands the same one to each of its consumers): each family's variants are looked up,
// and each variant saved with iptables-save, the first time someone asks, and the next one
// asking gets that reading, errors included. So one change costs one iptables-save per
// variant, however many consumers follow it. A change a consumer makes (Ensure's repairs) is
// not in it: it is announced, and read again, like any other.
type Snapshot struct {
	mu       sync.Mutex
	families map[family]*familyRules
}

// familyRules is one family's part of a Snapshot.
type familyRules struct {
	found foundVariants
	err   error // of findVariants
	// states[i] is variants[i]'s ruleset once saved[i]; errs[i] what saving it failed with.
	states []ruleset
	errs   []error
	saved  []bool
}

// NewSnapshot is a reading not yet taken: nothing runs until someone asks.
func NewSnapshot() *Snapshot { return &Snapshot{families: map[family]*familyRules{}} }

// family is fam's variants, looked up once. Called with mu held.
func (s *Snapshot) family(ctx context.Context, fam family) *familyRules {
	if fr, ok := s.families[fam]; ok {
		return fr
	}
	found, err := findVariants(ctx, fam)
	n := len(found.variants)
	fr := &familyRules{found: found, err: err, states: make([]ruleset, n), errs: make([]error, n), saved: make([]bool, n)}
	s.families[fam] = fr
	return fr
}

// variants are fam's variants on PATH and the mode of plain iptables (ip6tables).
func (s *Snapshot) variants(ctx context.Context, fam family) (foundVariants, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fr := s.family(ctx, fam)
	return fr.found, fr.err
}

// ruleset is variant i of fam (an index into variants' list) as iptables-save printed it.
func (s *Snapshot) ruleset(ctx context.Context, fam family, i int) (ruleset, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fr := s.family(ctx, fam)
	if !fr.saved[i] {
		fr.states[i], fr.errs[i] = fr.found.variants[i].save(ctx)
		fr.saved[i] = true
	}
	return fr.states[i], fr.errs[i]
}

// DockerUserRules is the package's DockerUserRules from this reading.
func (s *Snapshot) DockerUserRules(ctx context.Context) ([]string, error) {
	found, err := s.variants(ctx, familyIPv4)
	if err != nil {
		return nil, err
	}
	for i := range found.variants {
		rs, err := s.ruleset(ctx, familyIPv4, i)
		if err != nil {
			return nil, err
		}
		if !rs.hasDocker() {
			continue
		}
		specs, _ := rs.table("filter").chainRules("DOCKER-USER")
		var user []string
		for _, spec := range specs {
			if spec != "-j RETURN" {
				user = append(user, spec)
			}
		}
		return user, nil
	}
	return nil, nil
}
