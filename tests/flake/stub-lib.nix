# A stub of the few nixpkgs `lib` functions the procurator NixOS modules use,
# so the tests can evaluate the modules' own expressions without nixpkgs.
#
# What it is not: the NixOS module system. There is no type checking, no
# priorities (mkDefault is the identity), and mkMerge is a plain deep merge.
# Option declarations come back as the attribute sets given to mkOption, and
# escapeShellArgs returns its list, so a test can read the exact argv a unit
# would run. That is enough to check names, defaults, descriptions, flags and
# the unit settings each module computes; evaluating the modules in a real
# NixOS needs nixpkgs (see docs/NIX.md for what was and was not run).
let
  conflict = path: throw "stub mkMerge: two different definitions of ${path}";

  mergeAt =
    path: a: b:
    if builtins.isAttrs a && builtins.isAttrs b then
      a
      // builtins.mapAttrs (name: value: if a ? ${name} then mergeAt "${path}.${name}" a.${name} value else value) b
    else if builtins.isList a && builtins.isList b then
      a ++ b
    else if a == b then
      a
    else
      conflict path;
in
rec {
  mkOption = attrs: attrs // { _type = "option"; };
  mkEnableOption = name: {
    _type = "option";
    type = types.bool;
    default = false;
    description = "Whether to enable ${name}.";
  };
  literalExpression = text: {
    _type = "literalExpression";
    inherit text;
  };
  types = {
    str = { name = "str"; };
    bool = { name = "bool"; };
    port = { name = "port"; };
    package = { name = "package"; };
    listOf = elem: { name = "listOf"; inherit elem; };
    nullOr = elem: { name = "nullOr"; inherit elem; };
    enum = values: { name = "enum"; inherit values; };
    strMatching = regex: { name = "strMatching"; inherit regex; };
  };

  mkIf = condition: value: if condition then value else { };
  optionals = condition: list: if condition then list else [ ];
  mkMerge = builtins.foldl' (mergeAt "config") { };
  mkDefault = value: value;

  escapeShellArg = text: text;
  escapeShellArgs = list: list;
  getExe = package: "${package}/bin/procurator";
  any = builtins.any;
  setAttrByPath =
    path: value:
    builtins.foldl' (acc: name: { ${name} = acc; }) value (
      builtins.foldl' (acc: name: [ name ] ++ acc) [ ] (
        builtins.filter builtins.isString (builtins.split "\\." path)
      )
    );

  # The values of every option's default under `options` (options without a
  # default are left out), for building the `config` a test evaluates with.
  defaultsOf =
    options:
    builtins.mapAttrs (_: option: if option ? _type then option.default else defaultsOf option) (
      builtins.removeAttrs options (
        builtins.filter (
          name: (options.${name} ? _type) && !(options.${name} ? default)
        ) (builtins.attrNames options)
      )
    );
}
